# syntax=docker/dockerfile:1
# ime-bridge container image.
#   docker build -t ime-bridge:0.1.0 .
#   docker run --rm -p 9108:9108 -v "$PWD/config.yaml:/etc/ime-bridge/config.yaml:ro" \
#     -e IME_BRIDGE_IME__PASSWORD ime-bridge:0.1.0
# The install steps are the Makefile's (a venv, then pip install of this project), without the dev extra
# and not editable; tests/unit/test_dockerfile.py holds them to that; tests/component/test_dockerfile.py runs hadolint on this file.

# --- build: a virtual environment with the dependencies, then the application -----------------------
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, from pyproject.toml alone, so that this layer is rebuilt only when they change:
# [project] dependencies and the `registry` extra (the Schema Registry client), as `ime-bridge[registry]`.
# Wheels only: nothing is compiled, so no compiler is needed in either stage.
# dumb-init (from its PyPI wheel) runs as PID 1: it forwards SIGTERM to the bridge and reaps children.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['registry']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt \
    && /opt/venv/bin/pip install --only-binary=:all: dumb-init==1.2.5.post1

# The application: the same pyproject, its package and its Avro schemas.
COPY README.md ./
COPY schemas ./schemas
COPY bridge ./bridge
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/pip check

# --- runtime: the interpreter and the virtual environment, nothing else ------------------------------
FROM python:3.11.14-slim-bookworm AS runtime

# 10001 is the uid/gid the Helm chart runs the pod as (podSecurityContext.runAsUser / runAsGroup).
RUN groupadd --system --gid 10001 ime-bridge \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin ime-bridge

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
EXPOSE 9108
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]

# Exec form: no shell between dumb-init and the bridge, so signals reach `ime-bridge run` directly.
ENTRYPOINT ["dumb-init", "--", "ime-bridge", "run"]
CMD ["--config", "/etc/ime-bridge/config.yaml"]
