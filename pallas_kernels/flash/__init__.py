"""Block-sparse flash attention: block layouts, the shared arithmetic and the public entry point."""
