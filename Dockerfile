# frp-port-keeper's container image: the static binary of `make build` and
# nothing else. Build it with `make image`, which stages the build context
# (the binary and an empty data directory) in bin/image/; there is no base
# image to pull, so it builds offline. Run it on frps's host network: see
# docs/docker.md and deploy/docker-compose.yml.
FROM scratch
ARG VERSION=dev
LABEL org.opencontainers.image.title="frp-port-keeper" \
      org.opencontainers.image.description="Sticky remote ports for frp: an frps server plugin" \
      org.opencontainers.image.version="${VERSION}"
COPY frp-port-keeper /frp-port-keeper
# scratch has no mkdir and no /etc/passwd: the data directory comes from the
# context, owned by the numeric user the server runs as.
COPY --chown=65532:65532 data /data
USER 65532:65532
ENV FRP_PORT_KEEPER_DATA_DIR=/data
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["/frp-port-keeper", "health"]
ENTRYPOINT ["/frp-port-keeper"]
