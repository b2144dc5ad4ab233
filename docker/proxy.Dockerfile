# keyway-proxy image (gateway and, later, the provider agent). Build from the
# repository root:
#   docker build -f docker/proxy.Dockerfile -t ghcr.io/keyway-dev/keyway-proxy:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p keyway-proxy -p keyway-cli --bins \
 && strip target/release/keyway-proxy target/release/keyway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keyway-proxy /usr/local/bin/keyway-proxy
COPY --from=build /src/target/release/keyway /usr/local/bin/keyway
USER 65532:65532
# SSH, HTTPS (CONNECT), metrics. Binding :22 or :443 inside the pod needs
# NET_BIND_SERVICE; the chart maps Service ports onto these instead.
EXPOSE 2222 8443 9090
ENTRYPOINT ["/usr/local/bin/keyway-proxy"]
CMD ["run"]
