// Codebook i-quants block decoding (see common.h for the contract).
