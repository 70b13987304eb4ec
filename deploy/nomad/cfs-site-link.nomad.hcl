# The services of a site linked to a peer site (DESIGN.md §8): geo-replicator and
# conflict-resolver, as service jobs like cfs-site.nomad.hcl. Run on both sites once
# their NATS clusters are linked (nats.nomad.hcl, `cfs/<site>/link`), then
# `cfs admin replication-link --peer OTHER` on each site.
# tests/unit/test_deploy_files.py checks this file against the service specs.
#   nomad job run -var site=site-a deploy/nomad/cfs-site-link.nomad.hcl

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

job "cfs-site-link" {
  type = "service"

  meta {
    cfs_site = var.site
  }

  update {
    max_parallel     = 1
    min_healthy_time = "30s"
    healthy_deadline = "5m"
    auto_revert      = true
  }

  group "geo-replicator" {
    count = 2  # one holds the site lease, the other waits to take over

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
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "fail"  # then rescheduled on another node
    }

    reschedule {
      delay          = "10s"
      delay_function = "exponential"
      max_delay      = "2m"
      unlimited      = true
    }

    network {
      port "metrics" {}
    }

    task "geo-replicator" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "geo-replicator", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/georep.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
      }

      # Its own NATS key, the site CA and the NATS servers.
      template {
        destination = "secrets/georep.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/credentials/georep" }}{{ .nk }}{{ end }}
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
        name     = "cfs-geo-replicator"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "geo-replicator-metrics"
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

  group "conflict-resolver" {
    count = 2  # one holds the site lease, the other waits to take over

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
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "fail"  # then rescheduled on another node
    }

    reschedule {
      delay          = "10s"
      delay_function = "exponential"
      max_delay      = "2m"
      unlimited      = true
    }

    network {
      port "metrics" {}
    }

    task "conflict-resolver" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "conflict-resolver", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/conflicts.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
      }

      # Its own NATS key, the site CA and the NATS servers.
      template {
        destination = "secrets/conflicts.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/credentials/conflicts" }}{{ .nk }}{{ end }}
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
        name     = "cfs-conflict-resolver"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "conflict-resolver-metrics"
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
}
