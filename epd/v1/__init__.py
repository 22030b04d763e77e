"""Generated gRPC/protobuf modules for package epd.v1 (built from protos/)."""

from epd.protogen import generate as _generate

_generate()
