# imgenc worker / producer / search image.
#   GPU (default): TensorFlow with its CUDA libraries; run on a host with the NVIDIA
#     container toolkit, one worker per GPU.
#   CPU: docker build --build-arg VARIANT=cpu -t imgenc:cpu .   (TensorFlow for CPU plus
#     OpenVINO and NNCF: run workers with IMGENC_RUNTIME=openvino, IMGENC_PRECISION=int8)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    KERAS_HOME=/models \
    IMGENC_MODEL_CACHE=/models/openvino

RUN useradd --create-home --uid 1000 imgenc && mkdir -p /models /images /out \
    && chown imgenc /models /images /out

WORKDIR /app
COPY pyproject.toml README.md ./
COPY encoder ./encoder
COPY jobs ./jobs
COPY producer ./producer
COPY worker ./worker
COPY search ./search
COPY imgenc ./imgenc
ARG VARIANT=gpu
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install "tensorflow>=2.16,<2.22" && pip install ".[flower,openvino]"; \
    else \
        pip install "tensorflow[and-cuda]>=2.16,<2.22" && pip install ".[flower]"; \
    fi

USER imgenc
# One worker process per GPU: TensorFlow is not fork-safe, the model loads in the child.
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO", "--concurrency=1"]
