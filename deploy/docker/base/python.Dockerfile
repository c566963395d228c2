# Stands in for Docker Hub's python:3.11-slim-bookworm where no registry is reachable: Debian
# bookworm's own Python 3.11 on a debootstrap root file system (build-images.sh).
FROM local/debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 ca-certificates \
 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
CMD ["python3"]
