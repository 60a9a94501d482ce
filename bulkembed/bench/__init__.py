"""`bulkembed bench`: bulkembed against the raw decode ceiling and the real peers, by what each part measures:
inprocess (one resident model), engines (N engine processes), peers (llama-embedding, transformers), cli."""
