# Local stand-in for prom/prometheus, built from Debian's prometheus package.
# Same contract as the official image: ENTRYPOINT /bin/prometheus, config at /etc/prometheus/prometheus.yml,
# TSDB in the /prometheus volume, runs as nobody, listens on 9090.
ARG DEBIAN_BASE=bnserve-standin/debian:bookworm
FROM ${DEBIAN_BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && mkdir -p /prometheus /usr/share/prometheus \
 && mv /etc/prometheus/consoles /etc/prometheus/console_libraries /usr/share/prometheus/ \
 && chown -R nobody:nogroup /prometheus \
 && /bin/prometheus --version
LABEL org.opencontainers.image.description="local stand-in for prom/prometheus (Debian prometheus package)" \
      io.bnserve.standin="prom/prometheus"
USER nobody
EXPOSE 9090
VOLUME ["/prometheus"]
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", \
     "--storage.tsdb.path=/prometheus", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
