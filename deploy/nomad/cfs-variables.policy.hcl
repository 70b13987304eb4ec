# Read access of the ClaudeFS jobs to their Nomad variables, `cfs/<site>/...` (NATS keys,
# the site CA and server certificates, the SWIM token, the S3 keys). Attach it to each job:
#   for job in cfs-nats cfs-node cfs-site cfs-site-link; do
#     nomad acl policy apply -namespace default -job $job $job-variables \
#       deploy/nomad/cfs-variables.policy.hcl
#   done
# Every node's job identity can read every node's keys here; a site that wants a node's
# keys readable by that node alone issues them from Vault instead (one role per node).
namespace "default" {
  variables {
    path "cfs/*" {
      capabilities = ["read"]
    }
  }
}
