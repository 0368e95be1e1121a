// Entry points of the sanitizer check program.
#pragma once

namespace vera::check {

// Every VeRA kernel against reference.h; returns the number of failures.
int check_kernels(unsigned seed);

// run_claimed, the CPU decode path's work claiming, from several threads at once; returns the number of failures.
int check_claim_pool(unsigned seed);

}  // namespace vera::check
