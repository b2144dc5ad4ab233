# keyway-operator image. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/keyway-dev/keyway-operator:0.1.0 .
# (No Docker engine is available where Keyway is developed; this file is kept
# in step with the workspace: same toolchain, --locked, release profile.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p keyway-operator --bins \
 && strip target/release/keyway-operator

# glibc + libgcc only, no shell; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keyway-operator /usr/local/bin/keyway-operator
USER 65532:65532
EXPOSE 7070 9090
ENTRYPOINT ["/usr/local/bin/keyway-operator"]
CMD ["run"]
