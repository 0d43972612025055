"""Pure probes of an encoder's features: extraction, weighted kNN, the linear probe and feature
statistics. Functions of tensors, below the engine (its kNN monitor and collapse guard use them)."""
