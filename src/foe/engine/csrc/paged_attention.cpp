// Decode attention read straight from the paged KV pool (no gather into a dense copy).
//
// One query token per sequence. For sequence d and KV head m, the rep = N / M query heads that share
// m walk the sequence's blocks once: scores, a softmax, then the value sum, each key/value row read
// from its pool slot in place. Accumulates in float (double for a float64 model). Parallel over
// (sequence, KV head) with ATen's thread pool, so it follows torch.set_num_threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename scalar_t>
static void decode_kernel(const scalar_t* q, const scalar_t* kp, const scalar_t* vp, const int64_t* table,
                          const int64_t* lens, scalar_t* out, int64_t D, int64_t N, int64_t M, int64_t K,
                          int64_t W, int64_t block_size, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rep = N / M;
  at::parallel_for(0, D * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(rep * K), acc(rep * K), scores;
    for (int64_t dm = begin; dm < end; ++dm) {
      const int64_t d = dm / M, m = dm % M, len = lens[d];
      const int64_t* blocks = table + d * W;
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t k = 0; k < K; ++k) qf[r * K + k] = acc_t(q[(d * N + m * rep + r) * K + k]) * acc_t(scale);
      scores.assign(rep * len, acc_t(0));
      const int64_t row = M * K;  // pool stride between consecutive slots
      // Block by block, so a token's slot is base + t * row (no division per key).
      for (int64_t j0 = 0; j0 < len; j0 += block_size) {
        const scalar_t* base = kp + (blocks[j0 / block_size] * block_size * M + m) * K;
        const int64_t nt = std::min(block_size, len - j0);
        for (int64_t t = 0; t < nt; ++t) {
          const scalar_t* key = base + t * row;
          for (int64_t r = 0; r < rep; ++r) {
            const acc_t* qr = qf.data() + r * K;
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < K; ++k) s += qr[k] * acc_t(key[k]);
            scores[r * len + j0 + t] = s;
          }
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        acc_t* sr = scores.data() + r * len;
        acc_t mx = sr[0];
        for (int64_t j = 1; j < len; ++j) mx = sr[j] > mx ? sr[j] : mx;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; ++j) {
          sr[j] = std::exp(sr[j] - mx);
          sum += sr[j];
        }
        const acc_t inv = acc_t(1) / sum;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) sr[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < len; j0 += block_size) {
        const scalar_t* base = vp + (blocks[j0 / block_size] * block_size * M + m) * K;
        const int64_t nt = std::min(block_size, len - j0);
        for (int64_t t = 0; t < nt; ++t) {
          const scalar_t* val = base + t * row;
          for (int64_t r = 0; r < rep; ++r) {
            const acc_t p = scores[r * len + j0 + t];
            acc_t* ar = acc.data() + r * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) ar[k] += p * acc_t(val[k]);
          }
        }
      }
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t k = 0; k < K; ++k) out[(d * N + m * rep + r) * K + k] = scalar_t(acc[r * K + k]);
    }
  });
}

// q [D, N, K]; k_pool, v_pool [slots, M, K] (one layer); block_table [D, W]; lens [D] (keys per row).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_table, torch::Tensor lens, int64_t block_size,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "dtype mismatch");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(1) == 0, "head mismatch");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  q = q.contiguous();
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && block_table.is_contiguous() && lens.is_contiguous(),
              "contiguous pool and tables");
  auto out = torch::empty_like(q);
  const int64_t D = q.size(0), N = q.size(1), K = q.size(2), M = k_pool.size(1), W = block_table.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                            block_table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                            D, N, M, K, W, block_size, scale);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV pool");
}
