# cleanpref: runs the main job by default. With GPUs: docker run --gpus all cleanpref \
#   python algos/online_dpo.py --task skew_length --cuda
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLEANPREF_CACHE=/cache
WORKDIR /cleanpref

# dependencies first, so code changes do not reinstall them
COPY requirements.txt .
RUN pip install --no-compile -r requirements.txt

COPY . .
CMD ["python", "algos/online_dpo.py", "--task", "skew_length"]
