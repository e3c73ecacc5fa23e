; mtunnel lab guest: a 512-byte boot sector that keeps dirtying memory.
;
; Build: nasm -f bin -o guest.bin guest.asm   (lab.sh pads it into a raw disk image)
;
; Design
;   SeaBIOS loads this sector to 0x7c00 and jumps to it in real mode. We
;   1. disable interrupts (nothing ever needs them again; we never return to the BIOS),
;   2. enable A20 (BIOS int 15h/2401, then the "fast A20" bit of port 0x92) so that
;      addresses >= 1 MiB do not wrap to 0,
;   3. read the RAM size from CMOS while still in real mode:
;        0x34/0x35 = RAM above 16 MiB in 64 KiB units -> ram_end = 16 MiB + n * 64 KiB
;        fallback if that is 0 (guest <= 16 MiB): 0x30/0x31 = KiB above 1 MiB
;      (QEMU caps 0x34/0x35 at 0xffff, i.e. it describes memory below 4 GiB only;
;      for the lab's guests of a few hundred MiB that is all RAM),
;   4. load a flat GDT (4 GiB code + data segments) and enter 32-bit protected mode,
;   5. set byte 0 of every page >= 1 MiB to 1 (SeaBIOS left tables at the top of RAM;
;      and a non-zero page is a real page to migrate, not QEMU's cheap zero page),
;   6. publish a status block at 0x500 (read by `guest-check --wait` with HMP xp):
;        0x500 dword "MTLG"   the loop runs     0x504 dword  completed passes
;        0x508 dword ram_end
;   7. loop forever over every 4 KiB page from 1 MiB up to ram_end:
;        inc byte [page]            ; byte 0 of the page
;        busy-wait DELAY TSC ticks  ; rdtsc-based, ~100k ticks/page
;      At ~2.4 GHz that is ~24k pages/s (~100 MiB/s dirtied): the guest keeps
;      dirtying memory during a migration but the migration still converges.
;
; Invariant checked by lab/guest-check after a migration: byte 0 of the pages
; [1 MiB, k) hold v+1 and pages [k, ram_end) hold v (mod 256) for a single k -
; the position of the loop when the VM stopped. Any lost or stale page breaks it.
; Everything the code touches (code, GDT, stack) lives below 1 MiB.

DELAY       equ 100000          ; TSC ticks between two pages
INFO        equ 0x500           ; status block (free memory after the BIOS data area)
MAGIC       equ 0x474c544d      ; "MTLG" as a little-endian dword
START       equ 0x100000        ; first page dirtied: 1 MiB
PAGE        equ 4096

        bits 16
        org 0x7c00

start:
        cli
        cld
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        jmp 0:.cs0                  ; normalise CS:IP (some BIOSes jump to 07c0:0000)
.cs0:
        ; --- A20: ask the BIOS, then set the fast A20 gate (bit 1 of port 0x92,
        ;     never touching bit 0 = reset)
        mov ax, 0x2401
        int 0x15
        cli
        in al, 0x92
        or al, 2
        and al, 0xfe
        out 0x92, al

        ; --- RAM size from CMOS (bit 7 of the index keeps NMI disabled)
        mov al, 0x35 | 0x80
        out 0x70, al
        in al, 0x71
        mov ah, al
        mov al, 0x34 | 0x80
        out 0x70, al
        in al, 0x71
        mov [ram64k], ax
        mov al, 0x31 | 0x80
        out 0x70, al
        in al, 0x71
        mov ah, al
        mov al, 0x30 | 0x80
        out 0x70, al
        in al, 0x71
        mov [extkb], ax

        ; --- protected mode
        lgdt [gdt_desc]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        jmp 0x08:pm32

        bits 32
pm32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, 0x7c00

        ; ebp = ram_end
        movzx eax, word [ram64k]
        test eax, eax
        jz .small
        shl eax, 16                 ; * 64 KiB
        add eax, 0x1000000          ; + 16 MiB
        jmp .have
.small:
        movzx eax, word [extkb]
        shl eax, 10                 ; * 1 KiB
        add eax, START              ; + 1 MiB
.have:
        and eax, ~(PAGE - 1)
        mov ebp, eax
        mov dword [INFO + 8], eax
        mov dword [INFO + 4], 0

        ; set byte 0 of every page to 1 first: SeaBIOS leaves tables (ACPI, its
        ; high zone) at the top of RAM, whose first bytes would break the pattern,
        ; and all-zero pages would migrate as zero pages instead of real data
        mov edi, START
.clear:
        mov byte [edi], 1
        add edi, PAGE
        cmp edi, ebp
        jb .clear
        mov dword [INFO], MAGIC     ; now the loop runs
%ifdef IDLE
        ; idle variant (nasm -DIDLE): the pattern is written once, then the vCPU halts
        ; with interrupts off, so dozens of guests can migrate at once on two cores
.idle:
        hlt
        jmp .idle
%endif

        jmp .first

.pass:
        inc dword [INFO + 4]        ; one more pass completed
.first:
        mov edi, START
.page:
        cmp edi, ebp
        jae .pass                   ; wrapped: start the next pass
        inc byte [edi]
        rdtsc
        mov ebx, eax
.wait:
        pause
        rdtsc
        sub eax, ebx                ; low 32 bits; unsigned difference survives wrap
        cmp eax, DELAY
        jb .wait
        add edi, PAGE
        jmp .page

        align 8
gdt:
        dq 0                        ; null
        dq 0x00cf9a000000ffff       ; 0x08: code, base 0, limit 4 GiB, 32-bit
        dq 0x00cf92000000ffff       ; 0x10: data, base 0, limit 4 GiB
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd gdt

ram64k: dw 0
extkb:  dw 0

        times 510 - ($ - $$) db 0
        dw 0xaa55
