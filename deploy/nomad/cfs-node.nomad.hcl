# The per-node services of every storage node (node class "cfs-storage"): a system job,
# so each node runs one of each (DESIGN.md §2), each as `cfs service run NAME --node
# <the Nomad node's name>`, the way `cfs dev` starts them (libs/cfs/supervisor/site.py).
# tests/unit/test_deploy_files.py checks this file against the service specs.
#   nomad job run -var site=site-a deploy/nomad/cfs-node.nomad.hcl
#
# Each node has the host volume "cfs-data" (its metadata projection and fragments;
# owned by uid 10001, the image's user) and `meta.rack` (its failure domain). Nothing
# secret is in this file: every key comes from Nomad variables (cfs-variables.policy.hcl):
#   cfs/<site>/nats              ca (the site CA)
#   cfs/<site>/credentials/<node>/<role>   nk = that node's key file, e.g.
#     nomad var put cfs/site-a/credentials/storage-1/chunkstore \
#       nk=@$DIR/credentials/chunkstore@storage-1.nk
#   cfs/<site>/cluster           cluster_token (SWIM's datagram key: `cluster-token`)

variable "site" {
  type    = string
  default = "site-a"
}

variable "image" {
  type        = string
  default     = "claudefs:0.1.0"
  description = "the service image (Dockerfile, target service)"
}

variable "shards" {
  type        = number
  default     = 1
  description = "metadata shards, as at `cfs cluster init`"
}

job "cfs-node" {
  type = "system"

  meta {
    cfs_site = var.site
  }

  constraint {
    attribute = "${node.class}"
    value     = "cfs-storage"
  }

  # One node at a time: a node's loss never fails an operation, two at once could.
  update {
    max_parallel     = 1
    min_healthy_time = "30s"
    healthy_deadline = "5m"
  }

  group "metadata-raft" {
    # A system job is never rescheduled (it runs on every node): it restarts in place.
    restart {
      attempts = 10
      interval = "30m"
      delay    = "5s"
      mode     = "delay"
    }

    network {
      port "metrics" {}
    }

    volume "data" {
      type   = "host"
      source = "cfs-data"
    }

    task "metadata-raft" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "metadata-raft", "--node", "${node.unique.name}"]
      }

      volume_mount {
        volume      = "data"
        destination = "/var/lib/claudefs"
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/metadata.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
        CFS_LABELS           = "{\"rack\": \"${meta.rack}\"}"
      }

      # Its own NATS key (this node's), the site CA and the NATS servers.
      template {
        destination = "secrets/metadata.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar (printf "cfs/${var.site}/credentials/%s/metadata" (env "node.unique.name")) }}{{ .nk }}{{ end }}
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
        destination = "local/nats.env"
        env         = true
        data        = <<EOT
CFS_NATS_URLS=[{{ $sep := "" }}{{ range nomadService "cfs-nats" }}{{ $sep }}"nats://{{ .Address }}:{{ .Port }}"{{ $sep = "," }}{{ end }}]
EOT
      }

      service {
        name     = "cfs-metadata-raft"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "metadata-raft-metrics"
          type     = "http"
          path     = "/metrics"
          interval = "10s"
          timeout  = "3s"

          check_restart {
            limit = 3
            grace = "60s"
          }
        }
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "chunk-store" {
    # A system job is never rescheduled (it runs on every node): it restarts in place.
    restart {
      attempts = 10
      interval = "30m"
      delay    = "5s"
      mode     = "delay"
    }

    network {
      port "metrics" {}
    }

    volume "data" {
      type   = "host"
      source = "cfs-data"
    }

    task "chunk-store" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "chunk-store", "--node", "${node.unique.name}"]
      }

      volume_mount {
        volume      = "data"
        destination = "/var/lib/claudefs"
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/chunkstore.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
        CFS_LABELS           = "{\"rack\": \"${meta.rack}\"}"
      }

      # Its own NATS key (this node's), the site CA and the NATS servers.
      template {
        destination = "secrets/chunkstore.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar (printf "cfs/${var.site}/credentials/%s/chunkstore" (env "node.unique.name")) }}{{ .nk }}{{ end }}
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
        destination = "local/nats.env"
        env         = true
        data        = <<EOT
CFS_NATS_URLS=[{{ $sep := "" }}{{ range nomadService "cfs-nats" }}{{ $sep }}"nats://{{ .Address }}:{{ .Port }}"{{ $sep = "," }}{{ end }}]
EOT
      }

      service {
        name     = "cfs-chunk-store"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "chunk-store-metrics"
          type     = "http"
          path     = "/metrics"
          interval = "10s"
          timeout  = "3s"

          check_restart {
            limit = 3
            grace = "60s"
          }
        }
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "repair" {
    # A system job is never rescheduled (it runs on every node): it restarts in place.
    restart {
      attempts = 10
      interval = "30m"
      delay    = "5s"
      mode     = "delay"
    }

    network {
      port "metrics" {}
    }

    task "repair" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "repair", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/repair.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
        CFS_LABELS           = "{\"rack\": \"${meta.rack}\"}"
      }

      # Its own NATS key (this node's), the site CA and the NATS servers.
      template {
        destination = "secrets/repair.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar (printf "cfs/${var.site}/credentials/%s/repair" (env "node.unique.name")) }}{{ .nk }}{{ end }}
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
        destination = "local/nats.env"
        env         = true
        data        = <<EOT
CFS_NATS_URLS=[{{ $sep := "" }}{{ range nomadService "cfs-nats" }}{{ $sep }}"nats://{{ .Address }}:{{ .Port }}"{{ $sep = "," }}{{ end }}]
EOT
      }

      service {
        name     = "cfs-repair"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "repair-metrics"
          type     = "http"
          path     = "/metrics"
          interval = "10s"
          timeout  = "3s"

          check_restart {
            limit = 3
            grace = "60s"
          }
        }
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "membership" {
    # A system job is never rescheduled (it runs on every node): it restarts in place.
    restart {
      attempts = 10
      interval = "30m"
      delay    = "5s"
      mode     = "delay"
    }

    network {
      port "metrics" {}
      port "swim" { static = 7946 }
    }

    task "membership" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "membership", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/membership.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
        CFS_LABELS           = "{\"rack\": \"${meta.rack}\"}"
        CFS_SWIM_HOST        = "0.0.0.0"
        CFS_SWIM_PORT        = "${NOMAD_PORT_swim}"
        CFS_ADVERTISE_HOST   = "${NOMAD_IP_swim}"
      }

      # Its own NATS key (this node's), the site CA and the NATS servers.
      template {
        destination = "secrets/membership.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar (printf "cfs/${var.site}/credentials/%s/membership" (env "node.unique.name")) }}{{ .nk }}{{ end }}
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
        destination = "local/nats.env"
        env         = true
        data        = <<EOT
CFS_NATS_URLS=[{{ $sep := "" }}{{ range nomadService "cfs-nats" }}{{ $sep }}"nats://{{ .Address }}:{{ .Port }}"{{ $sep = "," }}{{ end }}]
EOT
      }

      # The SWIM key and the other members to join (every node's membership service).
      template {
        destination = "secrets/swim.env"
        env         = true
        perms       = "0400"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/cluster" }}CFS_CLUSTER_TOKEN={{ .cluster_token }}{{ end }}
CFS_SEEDS=[{{ $sep := "" }}{{ range nomadService "cfs-swim" }}{{ if ne .Address (env "NOMAD_IP_swim") }}{{ $sep }}"{{ .Address }}:{{ .Port }}"{{ $sep = "," }}{{ end }}{{ end }}]
EOT
      }

      service {
        name     = "cfs-membership"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "membership-metrics"
          type     = "http"
          path     = "/metrics"
          interval = "10s"
          timeout  = "3s"

          check_restart {
            limit = 3
            grace = "60s"
          }
        }
      }

      service {
        name     = "cfs-swim"
        port     = "swim"
        provider = "nomad"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
