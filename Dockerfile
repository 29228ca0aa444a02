# Chitu for NVIDIA GPUs: the image the manual's `docker run --gpus=all ... <image> <command>` runs.
#   docker build -t chitu .                                   (EXTRAS="flash_mla,deep_gemm" adds optional extras)
#   docker run --rm --gpus=all --privileged --shm-size=1g -p 21002:21002 -v /data:/data chitu \
#       python -m chitu serve.host=0.0.0.0 models=Qwen3-8B models.ckpt_dir=/data/Qwen3-8B
# Without a command it serves the default model (SmolLM2-135M-Instruct) on port 21002.
# A devel image: Triton compiles its kernels' launchers with the C compiler at run time.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ARG EXTRAS=""
SHELL ["/bin/bash", "-c"]
WORKDIR /opt/chitu
COPY . .
# The README's install (the image's torch kept, pinned), then the extras asked for, where they install.
RUN bash script/install.sh \
    && if [ -n "${EXTRAS}" ]; then python -m pip install --no-build-isolation ".[${EXTRAS}]" \
         -c <(python -m pip list --format freeze | grep -iE '^(torch|triton)=='); fi \
    && rm -rf /root/.cache/pip

EXPOSE 21002
CMD ["python", "-m", "chitu", "serve.host=0.0.0.0", "serve.port=21002"]
