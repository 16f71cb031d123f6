"""The prediction log: its database, the batched writer, the feedback store and key hashing."""
