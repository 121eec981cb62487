"""The contracts between processes (protobuf + gRPC); generated code is committed beside the .proto."""
