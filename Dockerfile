# The grapevine agent image: one statically linked binary and nothing else.
#
# Nothing is pulled (FROM scratch), so the image builds on machines without registry access;
# the binary is built on the host first:
#
#   RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
#       --target x86_64-unknown-linux-gnu --target-dir target/static --bin grapevine
#   docker build -t grapevine .
#
# glibc 2.34+ resolves host names (/etc/hosts, then the DNS servers of /etc/resolv.conf) from
# a static binary without loading NSS modules, which is all `--join NAME:PORT` needs in
# Docker (embedded DNS) and Kubernetes (cluster DNS).
FROM scratch
ARG BINARY=target/static/x86_64-unknown-linux-gnu/release/grapevine
COPY ${BINARY} /grapevine
# The data dir's mount point, owned by the agent's user: a volume mounted on it starts with
# this ownership, so `--data-dir /data` is writable without root.
COPY --chown=65532:65532 deploy/data/ /data/
# Gossip (UDP) and sync, RPC and control (TCP) share one port.
EXPOSE 7946/udp 7946/tcp
# Not root: the agent needs no privilege (the port is above 1024).
USER 65532:65532
ENTRYPOINT ["/grapevine"]
CMD ["--help"]
