# One image for the api, the workers and the trainer. torch comes from PyPI with its CUDA libraries;
# the GPU services get the devices through docker-compose's reservations.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MIADPO_DATA_DIR=/data HF_HOME=/models/hf

RUN apt-get update && apt-get install -y --no-install-recommends redis-tools curl && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cli cli
COPY core core
COPY app app
COPY workers workers
COPY trainer trainer
COPY deploy/accelerate deploy/accelerate
# The serving extra: `transformers serve`, the generation server of docker-compose.cpu.yml.
RUN pip install '.[serving]'

RUN useradd --create-home --uid 1000 miadpo && mkdir -p /data /models && chown miadpo /data /models
USER miadpo
EXPOSE 8000
CMD ["miadpo", "api", "--host", "0.0.0.0", "--port", "8000"]
