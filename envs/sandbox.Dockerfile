# The sandbox image: a Python interpreter and the LETI dispatcher, nothing else.
# `leti sandbox build` (src/leti/sandbox/image.py) passes BASE_IMAGE: the official Python
# image where a container registry is reachable, otherwise a minimal Debian made with
# debootstrap and `docker import`. Either way the build itself needs no network.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONHASHSEED=0 \
    PYTHONDONTWRITEBYTECODE=1

# A named non-root user. The pool runs each container as this uid plus its slot number, so
# that per-user process limits count each container's programs apart.
RUN echo "sandbox:x:61000:61000:LETI sandbox:/tmp:/usr/sbin/nologin" >> /etc/passwd \
 && echo "sandbox:x:61000:" >> /etc/group \
 && python3 -c "import sys; assert sys.version_info >= (3, 8), sys.version"

COPY dispatcher.py /opt/leti/dispatcher.py
RUN chmod 0444 /opt/leti/dispatcher.py

USER 61000:61000
WORKDIR /tmp
# The pool appends the dispatcher's limits (JSON) as the one argument.
ENTRYPOINT ["python3", "-X", "utf8", "-s", "/opt/leti/dispatcher.py"]
