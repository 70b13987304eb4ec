# A site's NATS JetStream cluster (DESIGN.md §1, §4): three servers on three storage nodes
# in different racks, file store on a host volume, fsync always, TLS for clients, routes
# and the site link (libs/cfs/tls.py). Run once per site:
#   nomad job run -var site=site-a deploy/nomad/nats.nomad.hcl
#
# Nothing secret is in this file: the templates read Nomad variables the job may read
# (policy: deploy/nomad/cfs-variables.policy.hcl), written from the config dir made by
#   cfs cluster credentials --site site-a --config-dir $DIR --node storage-1 ... \
#     --tls-server storage-1=10.0.1.11,storage-1 ...   # one per server: its node's address
#   nomad var put cfs/site-a/nats auth_conf=@$DIR/credentials/nats-auth.conf \
#     ca=@$DIR/credentials/tls/ca.pem
#   nomad var put cfs/site-a/tls/storage-1 cert=@$DIR/credentials/tls/server-storage-1.pem \
#     key=@$DIR/credentials/tls/server-storage-1.key          # ... for every server node
# Two linked sites (DESIGN.md §8, as libs/cfs/supervisor/sites.py links them): on the hub
# site `nomad var put cfs/site-a/link hub_password=...`; on the other site
# `nomad var put cfs/site-b/link remote_urls='"nats-leaf://cfs-site-link:PASSWORD@10.0.1.11:7422", ...'
# peer_ca=@<site-a>/credentials/tls/ca.pem`: its servers become leaf nodes of the hub's.
#
# A server keeps its store: it restarts in place and is never moved by the scheduler
# (a server on another node is a new JetStream peer; replace one with
# `cfs admin raft-force-leader` / the quorum-recovery steps of the README).

variable "site" {
  type        = string
  default     = "site-a"
  description = "the site: cluster name and JetStream domain"
}

variable "nats_image" {
  type    = string
  default = "nats:2.14-alpine"
}

job "cfs-nats" {
  type = "service"

  meta {
    cfs_site = var.site
  }

  update {
    max_parallel     = 1  # one server at a time: the others keep the quorum
    min_healthy_time = "30s"
    healthy_deadline = "5m"
    auto_revert      = true
  }

  group "nats" {
    count = 3

    constraint {
      attribute = "${node.class}"
      value     = "cfs-storage"
    }

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    spread {
      attribute = "${meta.rack}"
    }

    restart {
      attempts = 10
      interval = "30m"
      delay    = "5s"
      mode     = "delay"
    }

    # Never moved by the scheduler (see above): an operator replaces a lost server.
    reschedule {
      attempts  = 0
      unlimited = false
    }

    volume "jetstream" {
      type   = "host"
      source = "cfs-jetstream"
    }

    network {
      port "client" { static = 4222 }
      port "cluster" { static = 6222 }
      port "leaf" { static = 7422 }
      port "monitor" { static = 8222 }
    }

    service {
      name     = "cfs-nats"
      port     = "client"
      provider = "nomad"

      check {
        name     = "nats-healthz"
        type     = "http"
        port     = "monitor"
        # liveness only: a server catching up on its streams is not restarted
        path     = "/healthz?js-enabled-only=true"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 6
          grace = "60s"
        }
      }
    }

    service {
      name     = "cfs-nats-cluster"
      port     = "cluster"
      provider = "nomad"
    }

    task "nats-server" {
      driver = "docker"

      config {
        image        = var.nats_image
        network_mode = "host"
        args         = ["-c", "/local/nats.conf"]
      }

      volume_mount {
        volume      = "jetstream"
        destination = "/data"
      }

      # The server's certificate and key (0400, in the task's secrets directory).
      template {
        destination = "secrets/server.pem"
        perms       = "0400"
        data        = <<EOT
{{ with nomadVar (printf "cfs/${var.site}/tls/%s" (env "node.unique.name")) }}{{ .cert }}{{ end }}
EOT
      }

      template {
        destination = "secrets/server.key"
        perms       = "0400"
        data        = <<EOT
{{ with nomadVar (printf "cfs/${var.site}/tls/%s" (env "node.unique.name")) }}{{ .key }}{{ end }}
EOT
      }

      template {
        destination = "secrets/ca.pem"
        perms       = "0444"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/nats" }}{{ .ca }}{{ end }}
EOT
      }

      template {
        destination = "secrets/peer-ca.pem"
        perms       = "0444"
        data        = <<EOT
{{ if nomadVarExists "cfs/${var.site}/link" }}{{ with nomadVar "cfs/${var.site}/link" }}{{ .peer_ca }}{{ end }}{{ end }}
EOT
      }

      # Client authorization (public NKeys and per-role permissions) and the link
      # password: rendered into a secrets file, as nats-server reads it.
      template {
        destination   = "secrets/auth.conf"
        perms         = "0400"
        change_mode   = "signal"
        change_signal = "SIGHUP"  # nats-server reloads: a rotated key is admitted live
        data          = <<EOT
{{ with nomadVar "cfs/${var.site}/nats" }}{{ .auth_conf }}{{ end }}
{{ if nomadVarExists "cfs/${var.site}/link" }}{{ with nomadVar "cfs/${var.site}/link" }}
leafnodes {
{{ if .hub_password }}
  listen: 0.0.0.0:7422
  authorization { user: "cfs-site-link", password: "{{ .hub_password }}" }
  tls {
    cert_file: "/secrets/server.pem"
    key_file: "/secrets/server.key"
    ca_file: "/secrets/ca.pem"
    timeout: 5
  }
{{ end }}{{ if .remote_urls }}
  remotes = [
    { urls: [ {{ .remote_urls }} ], tls: { ca_file: "/secrets/peer-ca.pem" } }
  ]
{{ end }}
}
{{ end }}{{ end }}
EOT
      }

      template {
        destination = "local/nats.conf"
        change_mode = "restart"
        data        = <<EOT
server_name: {{ env "node.unique.name" }}
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
max_payload: 8MB
jetstream {
  store_dir: /data/jetstream
  sync_interval: always
  domain: "${var.site}"
}
tls {
  cert_file: "/secrets/server.pem"
  key_file: "/secrets/server.key"
  ca_file: "/secrets/ca.pem"
  timeout: 5
}
cluster {
  name: "${var.site}"
  listen: 0.0.0.0:6222
  routes: [ {{ range nomadService "cfs-nats-cluster" }}"nats-route://{{ .Address }}:{{ .Port }}" {{ end }}]
  tls {
    cert_file: "/secrets/server.pem"
    key_file: "/secrets/server.key"
    ca_file: "/secrets/ca.pem"
    verify: true
    timeout: 5
  }
}
include "../secrets/auth.conf"
EOT
      }

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
