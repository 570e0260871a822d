// Decode attention read straight from the paged KV pool (no gather into a dense copy).
//
// One query token per sequence. For sequence d and KV head m, the rep = N / M query heads that share
// m walk the sequence's blocks once. Keys are stored transposed within a block ([K][block_size]), so a
// query's scores against a block's tokens are K vector multiply-adds across the block, with no
// horizontal sums; values ([block_size][M][K]) are summed with vector multiply-adds along K.
// Accumulates in float (double for a float64 model). Parallel over (sequence, KV head) with ATen's
// thread pool, so it follows torch.set_num_threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <vector>

// BS_ and K_ > 0 fix the block size and head dim at compile time: the innermost loops (16-64 long) then
// become straight-line vector code instead of paying a loop's set-up on every block. 0 = any size.
template <typename scalar_t, int64_t BS_, int64_t K_>
static void decode_kernel(const scalar_t* q, const scalar_t* kp, const scalar_t* vp, const int64_t* table,
                          const int64_t* lens, scalar_t* out, int64_t D, int64_t N, int64_t M, int64_t K_rt,
                          int64_t W, int64_t bs_rt, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bs = BS_ > 0 ? BS_ : bs_rt, K = K_ > 0 ? K_ : K_rt;
  const int64_t rep = N / M;
  at::parallel_for(0, D * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(rep * K), acc(rep * K), scores;
    for (int64_t dm = begin; dm < end; ++dm) {
      const int64_t d = dm / M, m = dm % M, len = lens[d];
      const int64_t* blocks = table + d * W;
      const int64_t nblocks = (len + bs - 1) / bs;
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t k = 0; k < K; ++k) qf[r * K + k] = acc_t(q[(d * N + m * rep + r) * K + k]) * acc_t(scale);
      // scores[r][j] for j < nblocks * bs (the last block's tail is computed, then ignored)
      scores.assign(rep * nblocks * bs, acc_t(0));
      const int64_t srow = nblocks * bs;
      for (int64_t b = 0; b < nblocks; ++b) {
        const scalar_t* kb = kp + (blocks[b] * M + m) * K * bs;  // [K][bs]
        for (int64_t r = 0; r < rep; ++r) {
          const acc_t* qr = qf.data() + r * K;
          if constexpr (BS_ > 0) {  // the block's scores stay in registers across the K multiply-adds
            acc_t s[BS_] = {};
            for (int64_t k = 0; k < K; ++k) {
              const acc_t qk = qr[k];
#pragma omp simd
              for (int64_t t = 0; t < BS_; ++t) s[t] += qk * acc_t(kb[k * BS_ + t]);
            }
            std::copy(s, s + BS_, scores.data() + r * srow + b * BS_);
          } else {
            acc_t* sr = scores.data() + r * srow + b * bs;
            for (int64_t k = 0; k < K; ++k) {
              const acc_t qk = qr[k];
#pragma omp simd
              for (int64_t t = 0; t < bs; ++t) sr[t] += qk * acc_t(kb[k * bs + t]);
            }
          }
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        acc_t* sr = scores.data() + r * srow;
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
      if constexpr (K_ > 0) {  // one query head at a time, its output row in registers
        for (int64_t r = 0; r < rep; ++r) {
          acc_t a[K_] = {};
          const acc_t* sr = scores.data() + r * srow;
          for (int64_t b = 0; b < nblocks; ++b) {
            const scalar_t* vb = vp + blocks[b] * bs * M * K + m * K;  // token t at vb + t * M * K
            const int64_t nt = std::min(bs, len - b * bs);
            for (int64_t t = 0; t < nt; ++t) {
              const acc_t p = sr[b * bs + t];
#pragma omp simd
              for (int64_t k = 0; k < K_; ++k) a[k] += p * acc_t(vb[t * M * K + k]);
            }
          }
          std::copy(a, a + K_, acc.data() + r * K);
        }
      } else {
        for (int64_t b = 0; b < nblocks; ++b) {
          const scalar_t* vb = vp + blocks[b] * bs * M * K + m * K;
          const int64_t nt = std::min(bs, len - b * bs);
          for (int64_t t = 0; t < nt; ++t) {
            const scalar_t* val = vb + t * M * K;
            for (int64_t r = 0; r < rep; ++r) {
              const acc_t p = scores[r * srow + b * bs + t];
              acc_t* ar = acc.data() + r * K;
#pragma omp simd
              for (int64_t k = 0; k < K; ++k) ar[k] += p * acc_t(val[k]);
            }
          }
        }
      }
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t k = 0; k < K; ++k) out[(d * N + m * rep + r) * K + k] = scalar_t(acc[r * K + k]);
    }
  });
}

// q [D, N, K]; k_pool [blocks, M, K, bs] and v_pool [blocks, bs, M, K] (one layer);
// block_table [D, W]; lens [D] (keys each row sees).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_table, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.dim() == 4, "q [D, N, K], pools 4-d");
  const int64_t D = q.size(0), N = q.size(1), K = q.size(2), M = k_pool.size(1), bs = k_pool.size(3);
  TORCH_CHECK(k_pool.size(2) == K && v_pool.size(0) == k_pool.size(0) && v_pool.size(1) == bs &&
              v_pool.size(2) == M && v_pool.size(3) == K && N % M == 0, "pool / query shapes disagree");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "dtype mismatch");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && block_table.dim() == 2 &&
              block_table.size(0) == D && lens.numel() == D, "int64 block_table [D, W] and lens [D]");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous pools");
  q = q.contiguous();
  block_table = block_table.contiguous();
  lens = lens.contiguous();
  // Bounds, checked once here so the loops below can trust them (a bad table would read out of the pool).
  const int64_t W = block_table.size(1), nblocks = k_pool.size(0);
  for (int64_t d = 0; d < D; ++d)
    TORCH_CHECK(lens.data_ptr<int64_t>()[d] >= 1 && lens.data_ptr<int64_t>()[d] <= W * bs,
                "row ", d, " sees ", lens.data_ptr<int64_t>()[d], " keys; its table holds ", W * bs);
  for (int64_t i = 0; i < D * W; ++i)
    TORCH_CHECK(block_table.data_ptr<int64_t>()[i] >= 0 && block_table.data_ptr<int64_t>()[i] < nblocks,
                "block id ", block_table.data_ptr<int64_t>()[i], " outside the pool's ", nblocks, " blocks");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
             block_table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), D, N, M, K,
             W, bs, scale);
    };
    if (bs == 16 && K == 32) run(decode_kernel<scalar_t, 16, 32>);
    else if (bs == 16 && K == 64) run(decode_kernel<scalar_t, 16, 64>);
    else if (bs == 16 && K == 128) run(decode_kernel<scalar_t, 16, 128>);
    else if (bs == 16) run(decode_kernel<scalar_t, 16, 0>);
    else run(decode_kernel<scalar_t, 0, 0>);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV pool");
}
