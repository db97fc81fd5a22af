// Compile-time only (tsc -p drivers/js): the implementation must satisfy the published types.
import type * as Published from "@tricks-nats/driver";
import * as impl from "../src/index.js";

export const conforms: typeof Published = impl;
