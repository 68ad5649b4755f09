# A stand-in for the prom/prometheus image, for the compose smoke test where no image registry is
# reachable: Debian's prometheus package on the locally made Debian base, same entry point contract
# (docker-compose.yml passes every flag). Tagged as the image docker-compose.yml names.
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
