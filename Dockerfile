# syntax=docker/dockerfile:1
# The ClaudeFS image: every service runs from it as `cfs service run NAME --node ID`
# (deploy/compose, deploy/nomad); the `mount` target adds fuse3 for `cfs mount`.
#
#   docker build -t claudefs:0.1.0 .                      # services (default target)
#   docker build -t claudefs-mount:0.1.0 --target mount .  # FUSE mounts
#
# Nothing secret is baked in: NATS keys, the site CA and S3 keys are mounted read-only
# at run time from the config dir `cfs cluster credentials` / `cfs cluster init` wrote.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- wheels: pyfuse3 and zfec compile here, so the runtime carries no compiler ----------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends build-essential libfuse3-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY libs libs
COPY services services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- services ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
# libfuse3-3: pyfuse3's shared library (imported by the CLI even where nothing mounts)
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends libfuse3-3 \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels claudefs
# A fixed uid/gid, so host volumes and the mounted credentials can be given to it
# (`chown -R 10001:10001`); the node data lives under /var/lib/claudefs.
RUN groupadd --system --gid 10001 cfs \
 && useradd --system --uid 10001 --gid cfs --home-dir /var/lib/claudefs --shell /usr/sbin/nologin cfs \
 && install -d -o cfs -g cfs -m 0750 /var/lib/claudefs /etc/claudefs
ENV PYTHONUNBUFFERED=1 \
    CFS_DATA_DIR=/var/lib/claudefs \
    CFS_METRICS_HOST=0.0.0.0 \
    CFS_METRICS_PORT=9100
USER cfs:cfs
WORKDIR /var/lib/claudefs
VOLUME ["/var/lib/claudefs"]
EXPOSE 9100
# The metrics endpoint answers while the service runs (compose and Nomad check the same).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/metrics' % os.environ['CFS_METRICS_PORT'], timeout=3)"]
ENTRYPOINT ["cfs"]
CMD ["service", "list"]

# -- FUSE mounts: `cfs mount --foreground /mnt/cfs` (needs /dev/fuse and CAP_SYS_ADMIN) ---
FROM service AS mount
USER root
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o cfs -g cfs /mnt/cfs
USER cfs:cfs
HEALTHCHECK NONE
CMD ["mount", "--foreground", "/mnt/cfs"]

# The default target: `docker build .` gives the service image.
FROM service
