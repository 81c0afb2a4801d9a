"""Generated CSI gRPC stubs (make proto); do not edit."""
