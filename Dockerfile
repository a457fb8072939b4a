# updog-backup daemon image. The build context is the repository root:
#
#   docker build -t updog-backup .
#   docker build --build-arg PG_MAJOR=16 -t updog-backup:pg16 .   # see PG_MAJOR
#
# .dockerignore keeps target/, .git and local data out of the context. CI lints this file with
# hadolint (deploy/check.sh); no container engine runs there, so the image itself is not built
# by CI.
#
# Run (the config file is mounted; secrets come from the environment or files, never the image):
#   docker run --rm -p 9187:9187 -v /etc/updog-backup:/etc/updog-backup:ro \
#     --env-file updog-backup.env updog-backup            # CMD: daemon
#   docker run --rm ... updog-backup init                 # any other subcommand

ARG RUST_VERSION=1

# ---- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Cargo.toml declares the test and bench targets, so their sources must exist for cargo to
# read the manifest; config/ is compiled in (include_str!). fuzz/ is a separate crate.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY tests ./tests
COPY benches ./benches
RUN cargo build --release --locked --bin updog-backup \
 && install -D -m 0755 target/release/updog-backup /out/updog-backup

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim
# PG_MAJOR must be the major version of the source server: snapshots run its pg_dump
# (`pg_dump --schema-only`), which refuses servers newer than itself. Debian bookworm carries
# only postgresql-client-15. For another major, first add the PostgreSQL project's apt
# repository (PGDG) in this stage, before the install below:
#   apt-get install -y --no-install-recommends postgresql-common ca-certificates \
#   && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y
# (postgresql-common ships the repository's signing key; see https://wiki.postgresql.org/wiki/Apt)
ARG PG_MAJOR=15
# DL3008 (pin apt versions): the client must follow PG_MAJOR and Debian's security updates;
# a pinned version would break the build on the next point release.
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update; \
    if ! apt-cache show "postgresql-client-${PG_MAJOR}" >/dev/null 2>&1; then \
        echo "postgresql-client-${PG_MAJOR} is not in the configured apt sources: add the PGDG repository (see the comment above PG_MAJOR)" >&2; \
        exit 1; \
    fi; \
    apt-get install -y --no-install-recommends ca-certificates "postgresql-client-${PG_MAJOR}"; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 updog-backup; \
    useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/updog-backup \
        --no-create-home --shell /usr/sbin/nologin updog-backup; \
    install -d -m 0755 /etc/updog-backup; \
    install -d -m 0700 -o 10001 -g 10001 /var/lib/updog-backup /var/lib/updog-backup/spool; \
    "/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump" --version
COPY --from=build /out/updog-backup /usr/local/bin/updog-backup
# The annotated reference config, as a starting point; mount your own over it.
COPY config/updog-backup.toml /etc/updog-backup/updog-backup.toml
# The daemon finds /usr/lib/postgresql/<major>/bin itself; PATH makes `pg_dump` the same one.
# The spool holds only ciphertext (large packs and in-progress transactions, unlinked files).
ENV PATH="/usr/lib/postgresql/${PG_MAJOR}/bin:${PATH}" \
    UPDOG_BACKUP_CONFIG=/etc/updog-backup/updog-backup.toml \
    UPDOG_BACKUP__SERVER__LISTEN=0.0.0.0:9187 \
    UPDOG_BACKUP__STREAM__SPOOL_DIR=/var/lib/updog-backup/spool
USER 10001:10001
WORKDIR /var/lib/updog-backup
EXPOSE 9187
# SIGTERM stores the open pack and exits within daemon.shutdown_timeout (10 s): give the
# container runtime at least 30 s (docker stop -t 30; Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["updog-backup"]
CMD ["daemon"]
