"""The FedPuReL ClientApp."""
