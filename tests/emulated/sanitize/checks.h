// Entry points of the sanitizer check program.
#pragma once

namespace vera::check {

// Every VeRA kernel against reference.h; returns the number of failures.
int check_kernels(unsigned seed);

}  // namespace vera::check
