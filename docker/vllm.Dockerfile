# The vLLM rollout sidecar (rollout.engine: vllm): the upstream release image, pinned, plus the unprivileged
# user the chart runs it as (UID/GID 1000, runAsNonRoot; without a passwd entry torch's cache paths fail).
# The weight hand-over uses vLLM's dev-mode and RL routes (/collective_rpc, /pause, /weight_info), which
# change between releases: bump this tag, cluster.vllm_image and trainer.engines.vllm.VLLM_VERSION together.
#
#   docker build -f docker/vllm.Dockerfile -t ghcr.io/<you>/userloop-vllm:v0.32.0 docker/
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1

RUN (getent group 1000 || groupadd --gid 1000 userloop) \
    && (getent passwd 1000 || useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash userloop)

USER 1000:1000
WORKDIR /tmp
EXPOSE 8000
# The chart passes its own command, flags and environment (from the run config); this runs a server by hand.
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--help"]
