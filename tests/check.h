/*
 * check.h - the assertions every C test uses. Each failure prints file:line, the expression and
 * the values, then aborts (so a crash test's parent sees a signal, and ctest a failure).
 */
#ifndef CAP_CHECK_H
#define CAP_CHECK_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cap.h"

#define CHECK(expr)                                                                                \
    do {                                                                                           \
        if (!(expr)) {                                                                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #expr);               \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define CHECK_EQ(a, b)                                                                             \
    do {                                                                                           \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);                            \
        if (check_a_ != check_b_) {                                                                \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__,         \
                    __LINE__, #a, #b, check_a_, check_b_);                                         \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* An int-returning call that must succeed (0); prints the error's name and message otherwise. */
#define CHECK_OK(call)                                                                             \
    do {                                                                                           \
        int check_rc_ = (call);                                                                    \
        if (check_rc_ != 0) {                                                                      \
            fprintf(stderr, "%s:%d: CHECK_OK failed: %s -> %d %s (%s)\n", __FILE__, __LINE__,      \
                    #call, check_rc_, cap_errname(check_rc_), cap_strerror(check_rc_));            \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* A call that must fail with exactly `err`. */
#define CHECK_ERR(call, err)                                                                       \
    do {                                                                                           \
        int check_rc_ = (call);                                                                    \
        if (check_rc_ != (err)) {                                                                  \
            fprintf(stderr, "%s:%d: CHECK_ERR failed: %s -> %d %s, expected %s\n", __FILE__,       \
                    __LINE__, #call, check_rc_, cap_errname(check_rc_), cap_errname(err));         \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define CHECK_STREQ(a, b)                                                                          \
    do {                                                                                           \
        const char *check_sa_ = (a), *check_sb_ = (b);                                             \
        if (!check_sa_ || !check_sb_ || strcmp(check_sa_, check_sb_) != 0) {                      \
            fprintf(stderr, "%s:%d: CHECK_STREQ failed: %s == %s (\"%s\" vs \"%s\")\n", __FILE__,  \
                    __LINE__, #a, #b, check_sa_ ? check_sa_ : "(null)",                            \
                    check_sb_ ? check_sb_ : "(null)");                                             \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* A fresh, empty temporary directory for one test; the caller rm -rf's it (check_rmtree). */
char *check_tmpdir(const char *tag);
void check_rmtree(const char *dir);

#endif /* CAP_CHECK_H */
