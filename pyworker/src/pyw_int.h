/*
 * pyw_int.h - internals shared by the client's files (client.c, zygote.c, sync.c).
 */
#ifndef PYW_INT_H
#define PYW_INT_H

#include <sys/types.h>

#include "pyworker.h"
#include "pyw_proto.h"

/* A worker's own threads: main (cells), output reader, protocol. */
#define PYW_OWN_THREADS 3
/* CPU masks handled: 1024 CPUs. */
#define PYW_MASK_WORDS 16

/* Creates the client-side object for a started worker: sock is our end of its socket (owned from
 * here on), pid its pid (the caller must be its parent or subreaper), cgroup the directory it
 * joins ("" for none; removed when it exits). Starts reading, reaping and the start timer. */
int pyw__worker_attach(uv_loop_t *loop, const pyw_options_t *opt, int sock, pid_t pid,
                       const char *cgroup, pyw_worker_t **out);

/* Prepares the per-worker options string and, for a process limit, the cgroup directory
 * (created here; cgroup_out receives its path or ""). Returns 0, -ENOTSUP (a process limit is
 * asked for, we are root and no pids cgroup is writable) or -errno. */
int pyw__wopts_prepare(const pyw_options_t *opt, pyw_wopts_t *wo);

/* Kills every process in a cgroup directory and removes it (best effort). */
void pyw__cgroup_destroy(const char *dir);

/* The executable path: opt_path, else $CAPSULE_PYWORKER, else the build's default. */
const char *pyw__worker_path(const char *opt_path);

#endif /* PYW_INT_H */
