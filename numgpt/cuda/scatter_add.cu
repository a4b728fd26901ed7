// Adds rows into the rows an index names, where ids repeat: the embedding's and the classifier's
// weight gradients. Part of the one program numgpt/kernels.py compiles: its source(dtype) defines REAL.

// target (V,C) += values (N,C) at rows index (N,), deterministically: order (N,) lists the rows of
// values sorted by id, those of one id in their own order. Block (r, by) owns columns
// [blockDim.x by, blockDim.x (by + 1)) of sorted position r when r begins the run of its id (every
// other block returns at once), and adds the run's rows one after another, in the order NumPy's
// np.add.at adds them. Atomic adds (cupyx.scatter_add) would add them in whatever order threads
// arrive, so two runs of the same step could differ in the last bit.
extern "C" __global__ void scatter_add_rows(REAL* target, const REAL* values, const long long* index,
                                            const long long* order, long long N, int C) {
    long long r = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    long long id = index[order[r]];
    if (c >= C || (r > 0 && index[order[r - 1]] == id)) return;
    REAL sum = target[id * C + c];
    for (long long s = r; s < N && index[order[s]] == id; ++s)
        sum += values[order[s] * C + c];
    target[id * C + c] = sum;
}
