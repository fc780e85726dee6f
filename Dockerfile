# distgpt on an NVIDIA CUDA base image, with the cuda13 extra (CuPy, NCCL).
#   docker build -t distgpt .
#   docker run --gpus all --rm -it -v $PWD/runs:/work/runs distgpt distgpt train +run=single_gpu
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NCCL_NVLS_ENABLE=0
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential openssh-client && \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/distgpt
COPY . .
RUN pip install "torch>=2.9" --index-url https://download.pytorch.org/whl/cu130 && \
    pip install ".[cuda13,data,dev]"
WORKDIR /work
CMD ["distgpt", "--help"]
