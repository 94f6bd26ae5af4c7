"""The FedPuReL ServerApp."""
