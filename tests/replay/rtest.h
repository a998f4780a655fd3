/*
 * rtest.h - helpers of the capsule-replay tests: run the real binary, damage stored records.
 */
#ifndef RTEST_H
#define RTEST_H

#include <stddef.h>
#include <stdint.h>

#include "capsule.h"
#include "store.h"

/* The last run's stdout (NUL-ended). */
extern char rt_out[1 << 20];
/* Runs capsule-replay with args (NULL-ended, args[0] ignored); returns its exit status. With
 * RT_VERBOSE set in the environment, its stdout is echoed on stderr. */
int rt_run(const char *const *args);
#define RT_RUN(...) rt_run((const char *const[]){REPLAY_BIN, __VA_ARGS__, NULL})
/* Newline count of s. */
size_t rt_lines(const char *s);
/* The first seq stored at or after `from` (0 if none); *last = the last stored seq. */
uint64_t rt_stored_seq(const char *dir, uint64_t from, uint64_t *last);
/* Flips one byte of the body of record seq (flip = 1) or deletes the record (flip = 0). */
void rt_damage(const char *dir, uint64_t seq, int flip);
/* Runs n cells "v<i> = i * 2" (i from first) in sid, each must succeed. */
void rt_cells(eng_t *e, const char *sid, int first, int n);
/* Leaves dir as an engine killed with SIGKILL in the middle of executions of session "k" (and
 * collects the workers it leaves; the caller must be a child subreaper). */
void rt_killed_engine(const char *dir);
/* The repr of running code in sid. Caller frees. */
char *rt_eval(eng_t *e, const char *sid, const char *code);

#endif
