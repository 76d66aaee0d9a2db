// CPU execution layer: stands in for the CUDA runtime header (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
