# The filter as an OCI image (the "compat" layout): one layer, /plugin.wasm. With a
# container engine: docker build -f deploy/filter.Dockerfile -t knocker-filter .
# Without one, `make image` writes the same image as an OCI layout (scripts/oci-filter.sh).
FROM scratch
COPY target/wasm/knocker_filter.wasm /plugin.wasm
