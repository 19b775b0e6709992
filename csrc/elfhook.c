/*
 * elfhook.c - finding a loaded ELF object and rewriting its GOT slots.
 *
 * Contract: see internal.h.  Install-time code only (it allocates and calls
 * the loader); nothing here runs in a fork handler.
 *
 * How a slot is found: the object's dynamic section (PT_DYNAMIC, reached via
 * dl_iterate_phdr) gives the symbol and string tables and the two RELA
 * tables: DT_JMPREL (.rela.plt, JUMP_SLOT: calls through the PLT) and DT_RELA
 * (.rela.dyn, GLOB_DAT: calls of -fno-plt code and address-taken functions).
 * A relocation's offset plus the load bias is the slot; its symbol index
 * names the function.  The value of a slot is never used as "the original":
 * under lazy binding it is the PLT resolver, which would overwrite our patch.
 *
 * Protection: RELRO pages are read-only once relocation is done.  The loader
 * protects [bias + p_vaddr, bias + p_vaddr + p_memsz) of PT_GNU_RELRO, both
 * ends rounded down to a page; every other page has the protection of its
 * PT_LOAD segment.  We compute a slot's page protection the same way, make the
 * page writable only when it is not, and restore exactly that protection.
 */
#define _GNU_SOURCE
#include "internal.h"

#ifdef __linux__

#include <elf.h>
#include <link.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__)
#define RELOC_JUMP_SLOT R_X86_64_JUMP_SLOT
#define RELOC_GLOB_DAT R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define RELOC_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define RELOC_GLOB_DAT R_AARCH64_GLOB_DAT
#endif

struct zmqfork__elf {
    uintptr_t bias;        /* load bias: runtime address = bias + vaddr */
    const ElfW(Phdr) *phdr;
    size_t phnum;
    uintptr_t lo, hi;      /* runtime span of the PT_LOAD segments */
    uintptr_t relro_lo, relro_hi; /* read-only pages of PT_GNU_RELRO, or 0,0 */
    const ElfW(Sym) *symtab;
    const char *strtab;
    size_t strsz;
    const ElfW(Rela) *jmprel;
    size_t jmprelsz;
    const ElfW(Rela) *rela;
    size_t relasz;
    size_t relaent;
    char *name;
};

static uintptr_t page_size(void)
{
    long page = sysconf(_SC_PAGESIZE);
    return page > 0 ? (uintptr_t)page : 4096;
}

const char *zmqfork__elf_strerror(int code)
{
    switch (code) {
    case ZMQFORK__ELF_OK: return "success";
    case ZMQFORK__ELF_ENOTLINUX: return "ELF patching is built on Linux only";
    case ZMQFORK__ELF_EARCH: return "relocation types of this CPU are not known (x86_64 and aarch64 are)";
    case ZMQFORK__ELF_ENOTFOUND: return "no loaded object contains the address";
    case ZMQFORK__ELF_ENODYNAMIC: return "the object has no dynamic section";
    case ZMQFORK__ELF_EFORMAT: return "the object's dynamic section lacks RELA symbol tables";
    case ZMQFORK__ELF_ENOMEM: return "out of memory";
    case ZMQFORK__ELF_ERANGE: return "more GOT slots than expected for one symbol";
    case ZMQFORK__ELF_ESLOT: return "a GOT slot lies outside the object's segments";
    case ZMQFORK__ELF_EMPROTECT: return "mprotect could not make a GOT page writable";
    default: return "unknown error";
    }
}

/* ---- finding the object ----------------------------------------------- */

struct search {
    uintptr_t addr;
    int found;
    struct dl_phdr_info info;
};

static int contains(const struct dl_phdr_info *info, uintptr_t addr)
{
    for (size_t i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t start = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && addr >= start && addr - start < ph->p_memsz)
            return 1;
    }
    return 0;
}

static int search_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    struct search *search = data;
    (void)size;
    if (!contains(info, search->addr))
        return 0;
    search->info = *info;
    search->found = 1;
    return 1;
}

/*
 * Dynamic-section pointers: glibc rewrites most of them to run-time addresses
 * in place, musl (and glibc on some CPUs) leaves them as vaddrs.  A value
 * inside the object's span is already an address; otherwise add the bias.
 * Returns 0 if neither reading lands inside the object.
 */
static uintptr_t dyn_address(const zmqfork__elf *elf, ElfW(Addr) value)
{
    uintptr_t v = (uintptr_t)value;
    if (v >= elf->lo && v < elf->hi)
        return v;
    if (v + elf->bias >= elf->lo && v + elf->bias < elf->hi)
        return v + elf->bias;
    return 0;
}

/* Reads the dynamic section into elf; returns a ZMQFORK__ELF_* code. */
static int read_dynamic(zmqfork__elf *elf, const ElfW(Dyn) *dyn)
{
    ElfW(Addr) symtab = 0, strtab = 0, jmprel = 0, rela = 0;
    ElfW(Xword) pltrel = DT_RELA;
    int has_rel = 0;

    elf->relaent = sizeof(ElfW(Rela));
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = dyn->d_un.d_ptr; break;
        case DT_STRTAB: strtab = dyn->d_un.d_ptr; break;
        case DT_STRSZ: elf->strsz = dyn->d_un.d_val; break;
        case DT_JMPREL: jmprel = dyn->d_un.d_ptr; break;
        case DT_PLTRELSZ: elf->jmprelsz = dyn->d_un.d_val; break;
        case DT_PLTREL: pltrel = dyn->d_un.d_val; break;
        case DT_RELA: rela = dyn->d_un.d_ptr; break;
        case DT_RELASZ: elf->relasz = dyn->d_un.d_val; break;
        case DT_RELAENT: elf->relaent = dyn->d_un.d_val; break;
        case DT_REL: has_rel = 1; break;
        default: break;
        }
    }
    /* x86_64 and aarch64 use RELA only; REL here means a format we do not know. */
    if (has_rel || pltrel != DT_RELA || elf->relaent < sizeof(ElfW(Rela)))
        return ZMQFORK__ELF_EFORMAT;
    elf->symtab = (const ElfW(Sym) *)dyn_address(elf, symtab);
    elf->strtab = (const char *)dyn_address(elf, strtab);
    if (elf->symtab == NULL || elf->strtab == NULL || elf->strsz == 0)
        return ZMQFORK__ELF_EFORMAT;
    if (jmprel != 0 && elf->jmprelsz != 0) {
        elf->jmprel = (const ElfW(Rela) *)dyn_address(elf, jmprel);
        if (elf->jmprel == NULL)
            return ZMQFORK__ELF_EFORMAT;
    } else {
        elf->jmprelsz = 0;
    }
    if (rela != 0 && elf->relasz != 0) {
        elf->rela = (const ElfW(Rela) *)dyn_address(elf, rela);
        if (elf->rela == NULL)
            return ZMQFORK__ELF_EFORMAT;
    } else {
        elf->relasz = 0;
    }
    return ZMQFORK__ELF_OK;
}

int zmqfork__elf_open(const void *addr, zmqfork__elf **out)
{
    *out = NULL;
#if !defined(RELOC_JUMP_SLOT)
    (void)addr;
    return ZMQFORK__ELF_EARCH;
#else
    struct search search = {.addr = (uintptr_t)addr};
    dl_iterate_phdr(search_cb, &search);
    if (!search.found)
        return ZMQFORK__ELF_ENOTFOUND;

    zmqfork__elf *elf = calloc(1, sizeof *elf);
    if (elf == NULL)
        return ZMQFORK__ELF_ENOMEM;
    const struct dl_phdr_info *info = &search.info;
    uintptr_t page = page_size();
    const ElfW(Dyn) *dyn = NULL;

    elf->bias = info->dlpi_addr;
    elf->phdr = info->dlpi_phdr;
    elf->phnum = info->dlpi_phnum;
    elf->lo = UINTPTR_MAX;
    for (size_t i = 0; i < elf->phnum; i++) {
        const ElfW(Phdr) *ph = &elf->phdr[i];
        uintptr_t start = elf->bias + ph->p_vaddr;
        if (ph->p_type == PT_LOAD) {
            if (start < elf->lo)
                elf->lo = start;
            if (start + ph->p_memsz > elf->hi)
                elf->hi = start + ph->p_memsz;
        } else if (ph->p_type == PT_DYNAMIC) {
            dyn = (const ElfW(Dyn) *)start;
        } else if (ph->p_type == PT_GNU_RELRO) {
            elf->relro_lo = start & ~(page - 1);
            elf->relro_hi = (start + ph->p_memsz) & ~(page - 1);
        }
    }
    int rc = dyn == NULL ? ZMQFORK__ELF_ENODYNAMIC : read_dynamic(elf, dyn);
    if (rc == ZMQFORK__ELF_OK) {
        elf->name = strdup(info->dlpi_name ? info->dlpi_name : "");
        if (elf->name == NULL)
            rc = ZMQFORK__ELF_ENOMEM;
    }
    if (rc != ZMQFORK__ELF_OK) {
        zmqfork__elf_close(elf);
        return rc;
    }
    *out = elf;
    return ZMQFORK__ELF_OK;
#endif
}

const char *zmqfork__elf_name(const zmqfork__elf *elf)
{
    return elf->name;
}

void zmqfork__elf_close(zmqfork__elf *elf)
{
    if (elf == NULL)
        return;
    free(elf->name);
    free(elf);
}

/* ---- finding slots ---------------------------------------------------- */

#if defined(RELOC_JUMP_SLOT)
/* Scans one RELA table; returns a ZMQFORK__ELF_* code. */
static int scan(const zmqfork__elf *elf, const ElfW(Rela) *table, size_t size, const char *symbol,
                void ***slots, size_t max, size_t *count)
{
    size_t n = size / elf->relaent;
    for (size_t i = 0; i < n; i++) {
        const ElfW(Rela) *r = (const ElfW(Rela) *)((const char *)table + i * elf->relaent);
        unsigned long type = ELF64_R_TYPE(r->r_info);
        if (type != RELOC_JUMP_SLOT && type != RELOC_GLOB_DAT)
            continue;
        size_t name = elf->symtab[ELF64_R_SYM(r->r_info)].st_name;
        if (name >= elf->strsz || strcmp(elf->strtab + name, symbol) != 0)
            continue;
        uintptr_t slot = elf->bias + r->r_offset;
        if (slot < elf->lo || slot + sizeof(void *) > elf->hi || slot % sizeof(void *) != 0)
            return ZMQFORK__ELF_ESLOT;
        int seen = 0; /* a linker may list .rela.plt inside DT_RELA too */
        for (size_t k = 0; k < *count; k++)
            seen |= slots[k] == (void **)slot;
        if (seen)
            continue;
        if (*count == max)
            return ZMQFORK__ELF_ERANGE;
        slots[(*count)++] = (void **)slot;
    }
    return ZMQFORK__ELF_OK;
}
#endif

int zmqfork__elf_find(const zmqfork__elf *elf, const char *symbol, void ***slots, size_t max,
                      size_t *count)
{
    *count = 0;
#if !defined(RELOC_JUMP_SLOT)
    (void)elf, (void)symbol, (void)slots, (void)max;
    return ZMQFORK__ELF_EARCH;
#else
    int rc = scan(elf, elf->jmprel, elf->jmprelsz, symbol, slots, max, count);
    if (rc == ZMQFORK__ELF_OK)
        rc = scan(elf, elf->rela, elf->relasz, symbol, slots, max, count);
    if (rc != ZMQFORK__ELF_OK)
        *count = 0;
    return rc;
#endif
}

/* ---- patching --------------------------------------------------------- */

/* The protection the loader left on the page holding addr; -1 if unknown. */
static int page_protection(const zmqfork__elf *elf, uintptr_t addr)
{
    for (size_t i = 0; i < elf->phnum; i++) {
        const ElfW(Phdr) *ph = &elf->phdr[i];
        uintptr_t start = elf->bias + ph->p_vaddr;
        if (ph->p_type != PT_LOAD || addr < start || addr - start >= ph->p_memsz)
            continue;
        if (addr >= elf->relro_lo && addr < elf->relro_hi)
            return PROT_READ;
        return ((ph->p_flags & PF_R) ? PROT_READ : 0) | ((ph->p_flags & PF_W) ? PROT_WRITE : 0) |
               ((ph->p_flags & PF_X) ? PROT_EXEC : 0);
    }
    return -1;
}

/* Writes one slot, unprotecting its page if needed; returns a ZMQFORK__ELF_* code. */
static int write_slot(const zmqfork__elf *elf, void **slot, void *value)
{
    uintptr_t page = page_size();
    int prot = page_protection(elf, (uintptr_t)slot);
    if (prot < 0)
        return ZMQFORK__ELF_ESLOT;
    void *start = (void *)((uintptr_t)slot & ~(page - 1));
    int must_unprotect = !(prot & PROT_WRITE);
    if (must_unprotect && mprotect(start, page, prot | PROT_READ | PROT_WRITE) != 0)
        return ZMQFORK__ELF_EMPROTECT;
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);
    /* Giving the page its protection back cannot fail for a range that
     * mprotect just accepted; if it ever did, the page stays writable, which
     * is what a partial-RELRO object has anyway. */
    if (must_unprotect)
        (void)mprotect(start, page, prot);
    return ZMQFORK__ELF_OK;
}

int zmqfork__elf_slot_writable(const zmqfork__elf *elf, void **slot)
{
    int prot = page_protection(elf, (uintptr_t)slot);
    return prot >= 0 && (prot & PROT_WRITE) != 0;
}

int zmqfork__elf_owns(const zmqfork__elf *elf, const void *addr)
{
    return page_protection(elf, (uintptr_t)addr) >= 0;
}

/* The testing failure (install time only: callers serialise). */
static int testing_armed;
static unsigned int testing_left;
static void (*testing_before)(void);

void zmqfork__elf_testing_fail_after(unsigned int after, void (*before)(void))
{
    testing_left = after;
    testing_before = before;
    testing_armed = 1;
}

/* 1 if the testing failure fires at the slot about to be written. */
static int testing_fails_now(void)
{
    if (!testing_armed)
        return 0;
    if (testing_left > 0) {
        testing_left--;
        return 0;
    }
    testing_armed = 0;
    if (testing_before != NULL)
        testing_before();
    return 1;
}

int zmqfork__elf_replace(zmqfork__elf *elf, void **const *slots, void *const *values, size_t n)
{
    void **old = calloc(n ? n : 1, sizeof *old);
    if (old == NULL)
        return ZMQFORK__ELF_ENOMEM;
    int rc = ZMQFORK__ELF_OK;
    size_t done = 0;
    for (; done < n; done++) {
        old[done] = __atomic_load_n(slots[done], __ATOMIC_ACQUIRE);
        rc = testing_fails_now() ? ZMQFORK__ELF_EMPROTECT
                                 : write_slot(elf, slots[done], values[done]);
        if (rc != ZMQFORK__ELF_OK)
            break;
    }
    if (rc != ZMQFORK__ELF_OK) {
        /* Roll back what was written; these pages were writable a moment ago. */
        while (done-- > 0)
            (void)write_slot(elf, slots[done], old[done]);
    }
    free(old);
    return rc;
}

#else /* !__linux__ */

const char *zmqfork__elf_strerror(int code)
{
    return code == ZMQFORK__ELF_OK ? "success" : "ELF patching is built on Linux only";
}

int zmqfork__elf_open(const void *addr, zmqfork__elf **out)
{
    (void)addr;
    *out = NULL;
    return ZMQFORK__ELF_ENOTLINUX;
}

const char *zmqfork__elf_name(const zmqfork__elf *elf)
{
    (void)elf;
    return "";
}

int zmqfork__elf_find(const zmqfork__elf *elf, const char *symbol, void ***slots, size_t max,
                      size_t *count)
{
    (void)elf, (void)symbol, (void)slots, (void)max;
    *count = 0;
    return ZMQFORK__ELF_ENOTLINUX;
}

int zmqfork__elf_replace(zmqfork__elf *elf, void **const *slots, void *const *values, size_t n)
{
    (void)elf, (void)slots, (void)values, (void)n;
    return ZMQFORK__ELF_ENOTLINUX;
}

void zmqfork__elf_close(zmqfork__elf *elf)
{
    (void)elf;
}

int zmqfork__elf_slot_writable(const zmqfork__elf *elf, void **slot)
{
    (void)elf, (void)slot;
    return 0;
}

int zmqfork__elf_owns(const zmqfork__elf *elf, const void *addr)
{
    (void)elf, (void)addr;
    return 0;
}

void zmqfork__elf_testing_fail_after(unsigned int after, void (*before)(void))
{
    (void)after, (void)before;
}

#endif /* __linux__ */
