# The SGLang rollout sidecar: the upstream release image, pinned, plus the unprivileged user the chart
# runs it as (UID/GID 1000, runAsNonRoot). SGLang's HTTP API changes between releases
# (weight-update endpoints, /ready): bump this tag and cluster.sglang_image together, deliberately.
#
#   docker build -f docker/sglang.Dockerfile -t ghcr.io/<you>/userloop-sglang:v0.5.19-cu129 docker/
FROM lmsysorg/sglang:v0.5.19-cu129

ENV PYTHONUNBUFFERED=1

RUN (getent group 1000 || groupadd --gid 1000 userloop) \
    && (getent passwd 1000 || useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash userloop)

USER 1000:1000
WORKDIR /tmp
EXPOSE 30000
# The chart passes its own command and flags (from the run config); this runs a server by hand.
ENTRYPOINT ["python3", "-m", "sglang.launch_server"]
CMD ["--help"]
