"""What a card holds beyond tensors: the allocation trace, the caching-allocator model, costs outside it."""
