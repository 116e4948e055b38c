# tsptq: the service (API, dispatcher, CLI) and a Ray node, in one image.
#
#   docker build -t tsptq .                                    # CPU wheels of torch
#   docker build --build-arg TORCH_INDEX_URL= -t tsptq .       # PyPI's default (CUDA) wheels
#   docker run --rm -p 8000:8000 tsptq serve --host 0.0.0.0    # one container: API + dispatcher
#                                                              # + local Ray + SQLite in /data
# docker-compose.yml runs the pieces apart (PostgreSQL, a Ray cluster, API, dispatcher).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is the bulk and changes least often.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; \
    else \
        pip install torch==2.14.1 torchvision==0.29.1; \
    fi

WORKDIR /src
# Only what the package needs (no .venv, no out/): a narrow context keeps the layer cacheable.
COPY pyproject.toml README.md ./
COPY quant ./quant
COPY search ./search
COPY workers ./workers
COPY service ./service
COPY api ./api
COPY bench ./bench
COPY migrations ./migrations
COPY export ./export
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 1000 tsptq \
    && mkdir -p /data /datasets \
    && chown tsptq:tsptq /data /datasets
USER tsptq
WORKDIR /home/tsptq
# SQLite database (when TSPTQ_DATABASE_URL is unset) and the default data root live in /data.
ENV TSPTQ_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["tsptq"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
