# A site's NATS JetStream cluster as a Nomad system job: one server per storage
# node (node class "cfs-storage"), host volume for the store, fsync always.
job "cfs-nats" {
  type = "system"

  group "nats" {
    constraint {
      attribute = "${node.class}"
      value     = "cfs-storage"
    }

    volume "jetstream" {
      type   = "host"
      source = "cfs-jetstream"
    }

    network {
      port "client"  { static = 4222 }
      port "cluster" { static = 6222 }
      port "monitor" { static = 8222 }
    }

    task "nats-server" {
      driver = "exec"

      config {
        command = "nats-server"
        args    = ["-c", "${NOMAD_TASK_DIR}/nats.conf"]
      }

      volume_mount {
        volume      = "jetstream"
        destination = "/data"
      }

      template {
        destination = "${NOMAD_TASK_DIR}/nats.conf"
        data        = <<EOT
server_name: {{ env "node.unique.name" }}
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
max_payload: 8MB
jetstream { store_dir: /data/jetstream, sync_interval: always }
cluster {
  name: {{ env "meta.cfs_site" }}
  listen: 0.0.0.0:6222
  routes: [ {{ range nomadService "cfs-nats-cluster" }}nats-route://{{ .Address }}:{{ .Port }} {{ end }}]
}
# Client authorization: public NKeys and per-role permissions written by
# `cfs cluster credentials`, stored with
#   nomad var put nomad/jobs/cfs-nats auth_conf=@$CFS_CONFIG_DIR/credentials/nats-auth.conf
{{ with nomadVar "nomad/jobs/cfs-nats" }}{{ .auth_conf }}{{ end }}
EOT
      }

      service {
        name     = "cfs-nats-cluster"
        port     = "cluster"
        provider = "nomad"
      }

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
