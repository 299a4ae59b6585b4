"""Vendored subset of BuildKit's gRPC API (moby/buildkit, Apache-2.0); regenerate with
scripts/gen-buildkit-pb. Only the generated modules import grpc/protobuf."""
