# The saga_worker image: worker, beat, Flower, the console, the migration job and the CLI
# all run from it.
#   docker build -t saga-worker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY saga_worker ./saga_worker
COPY saga_remote.py ./
COPY migrations ./migrations
RUN pip install '.[flower,web]' \
    && useradd --system --uid 10001 --create-home --home-dir /home/saga saga

# Run from outside the source tree: the installed package (migrations included) is used.
WORKDIR /home/saga
USER saga

# The example saga (docs/contract.md); add your modules, comma-separated.
ENV SAGA_IMPORTS=saga_worker.examples

# 9100: worker metrics, 9101: beat metrics, 5555: Flower, 8090: the console.
EXPOSE 9100 9101 5555 8090

CMD ["celery", "-A", "saga_worker.app", "worker", "--loglevel", "INFO"]
