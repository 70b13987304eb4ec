# The site services (DESIGN.md §1): service jobs of two allocations each, on storage
# nodes in different racks. Only the holder of the `service.<name>` lease works; the
# other takes over within a lease time when its node or process fails (the runtime's
# site-singleton lease), and Nomad reschedules a failed allocation elsewhere.
# Each runs as `cfs service run NAME --node <the Nomad node's name>`.
# tests/unit/test_deploy_files.py checks this file against the service specs.
#   nomad job run -var site=site-a deploy/nomad/cfs-site.nomad.hcl
#
# Nothing secret is in this file (Nomad variables, cfs-variables.policy.hcl):
#   cfs/<site>/nats                  ca
#   cfs/<site>/credentials/<role>    nk, e.g. nomad var put cfs/site-a/credentials/backup \
#                                      nk=@$DIR/credentials/backup.nk
#   cfs/<site>/s3                    ini (AWS credentials-file format: objstore/settings.py)

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

variable "s3_endpoint" {
  type    = string
  default = "http://minio.service.consul:9000"
}

variable "s3_region" {
  type    = string
  default = "us-east-1"
}

variable "archive_url" {
  type        = string
  default     = "s3://cfs-backups/archive"
  description = "the continuous journal archive of backup"
}

job "cfs-site" {
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

  group "backup" {
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

    # the last snapshots, kept for fetching (keep_local), follow the allocation
    ephemeral_disk {
      size    = 2048
      sticky  = true
      migrate = true
    }

    network {
      port "metrics" {}
    }

    task "backup" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "backup", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE                = "${var.site}"
        CFS_SHARDS              = "${var.shards}"
        CFS_DATA_DIR            = "/alloc/data"
        CFS_METRICS_HOST        = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT        = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS    = "/secrets/backup.nk"
        CFS_NATS_CA             = "/secrets/ca.pem"
        CFS_S3_ENDPOINT_URL     = "${var.s3_endpoint}"
        CFS_S3_REGION           = "${var.s3_region}"
        CFS_S3_CREDENTIALS_FILE = "/secrets/s3.ini"
        CFS_ARCHIVE_URL         = "${var.archive_url}"
      }

      # Its own NATS key, the site CA and the NATS servers.
      template {
        destination = "secrets/backup.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/credentials/backup" }}{{ .nk }}{{ end }}
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

      template {
        destination = "secrets/s3.ini"
        perms       = "0400"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/s3" }}{{ .ini }}{{ end }}
EOT
      }

      service {
        name     = "cfs-backup"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "backup-metrics"
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

  group "s3-tierer" {
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

    task "s3-tierer" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "s3-tierer", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE                = "${var.site}"
        CFS_SHARDS              = "${var.shards}"
        CFS_DATA_DIR            = "/var/lib/claudefs"
        CFS_METRICS_HOST        = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT        = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS    = "/secrets/tierer.nk"
        CFS_NATS_CA             = "/secrets/ca.pem"
        CFS_S3_ENDPOINT_URL     = "${var.s3_endpoint}"
        CFS_S3_REGION           = "${var.s3_region}"
        CFS_S3_CREDENTIALS_FILE = "/secrets/s3.ini"
      }

      # Its own NATS key, the site CA and the NATS servers.
      template {
        destination = "secrets/tierer.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/credentials/tierer" }}{{ .nk }}{{ end }}
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

      template {
        destination = "secrets/s3.ini"
        perms       = "0400"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/s3" }}{{ .ini }}{{ end }}
EOT
      }

      service {
        name     = "cfs-s3-tierer"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "s3-tierer-metrics"
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

  group "alerts" {
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

    task "alerts" {
      driver       = "docker"
      user         = "10001:10001"
      kill_timeout = "15s" # a service stops within 8 s (cfs.service_main.STOP_DEADLINE_S)

      config {
        image        = var.image
        network_mode = "host"
        entrypoint   = ["cfs"]
        args         = ["service", "run", "alerts", "--node", "${node.unique.name}"]
      }

      env {
        CFS_SITE             = "${var.site}"
        CFS_SHARDS           = "${var.shards}"
        CFS_DATA_DIR         = "/var/lib/claudefs"
        CFS_METRICS_HOST     = "${NOMAD_IP_metrics}"
        CFS_METRICS_PORT     = "${NOMAD_PORT_metrics}"
        CFS_NATS_CREDENTIALS = "/secrets/alerts.nk"
        CFS_NATS_CA          = "/secrets/ca.pem"
      }

      # Its own NATS key, the site CA and the NATS servers.
      template {
        destination = "secrets/alerts.nk"
        perms       = "0400"
        change_mode = "restart"
        data        = <<EOT
{{ with nomadVar "cfs/${var.site}/credentials/alerts" }}{{ .nk }}{{ end }}
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
        name     = "cfs-alerts"
        port     = "metrics"
        provider = "nomad"
        tags     = ["metrics", "${var.site}"]

        check {
          name     = "alerts-metrics"
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
