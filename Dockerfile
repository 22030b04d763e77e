# One image for the operator, the router and every worker role: `epd ...`.
# Build stage: a virtualenv with epd-serve installed (protos compiled by the build).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/epd
COPY pyproject.toml setup.py README.md /src/
COPY epd /src/epd
COPY protos /src/protos
COPY workers /src/workers
COPY operator /src/operator
COPY bench /src/bench
RUN /opt/epd/bin/pip install /src

# Final stage: the virtualenv only; no compilers, no pip cache, non-root.
FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp epd
COPY --from=build /opt/epd /opt/epd
ENV PATH=/opt/epd/bin:$PATH HOME=/tmp EPD_MODEL_CACHE=/tmp/epd-models PYTHONUNBUFFERED=1
USER 10001:10001
# router HTTP and metrics, worker gRPC, health (kubelet probes) and metrics, operator health and metrics
EXPOSE 8000 9100 50051 50052 9090 8080
ENTRYPOINT ["epd"]
CMD ["--help"]
