"""The platform: backbone pretraining, feature export, the Flower ServerApp, evaluation."""
