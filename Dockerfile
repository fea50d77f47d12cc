# hbone-proxy container image: `docker build -t hbone-proxy:0.1.0 .` (README "Container and Kubernetes").
# Two stages: the build stage installs into a venv; the runtime stage copies only that venv, so no
# source tree, build tools or pip caches end up in the image.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/hbone-proxy
ENV PATH=/opt/hbone-proxy/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that editing the source reuses this layer.
# uvloop, httptools and cryptography ship manylinux wheels for CPython 3.11: no compiler needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt

# The project itself (no test extras). README.md is the package's long description (pyproject `readme`).
COPY README.md ./
COPY proxy ./proxy
COPY hbone ./hbone
COPY policy ./policy
COPY certs ./certs
COPY benchmarks ./benchmarks
RUN pip install --no-deps . \
    && hbone-proxy --help >/dev/null


FROM python:3.11-slim

LABEL org.opencontainers.image.title="hbone-proxy" \
      org.opencontainers.image.description="User-space HBONE proxy: Istio ambient waypoint and node proxy" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/hbone-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric UID/GID: Kubernetes can only verify `runAsNonRoot` against a numeric USER, and the
# manifests in deploy/ set the same ids (runAsUser/fsGroup 10001).
RUN groupadd --system --gid 10001 hbone \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin hbone \
    && mkdir -p /etc/hbone-proxy/config /etc/hbone-proxy/certs

COPY --from=build /opt/hbone-proxy /opt/hbone-proxy

USER 10001:10001
WORKDIR /tmp

# DESIGN §2. 15000 (admin) listens on 127.0.0.1 inside the container on purpose: use
# `docker exec CONTAINER hbone-proxy proxy-config all`, never a published port.
#   15008 HBONE inbound   15001 outbound capture   15006 inbound plaintext   15080 SOCKS5
#   15000 admin           15020 metrics            15021 readiness
EXPOSE 15008 15001 15006 15080 15000 15020 15021

# slim has no curl: ask with the interpreter we ship. urlopen raises on a 503 (starting or
# draining), so the exit status is 0 only for 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=2).status != 200)"]

ENTRYPOINT ["hbone-proxy"]
# A waypoint by default; mount the config files (or directory) on /etc/hbone-proxy/config and
# cert-chain.pem, key.pem, root-cert.pem (`hbone-proxy certs issue`) on /etc/hbone-proxy/certs.
# Anything after the image name on `docker run` replaces these arguments.
CMD ["run", "--mode=waypoint", \
     "--config=/etc/hbone-proxy/config", \
     "--cert=/etc/hbone-proxy/certs/cert-chain.pem", \
     "--key=/etc/hbone-proxy/certs/key.pem", \
     "--ca=/etc/hbone-proxy/certs/root-cert.pem", \
     "--hbone-addr=0.0.0.0:15008", \
     "--metrics-addr=0.0.0.0:15020", \
     "--readiness-addr=0.0.0.0:15021"]
